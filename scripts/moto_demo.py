"""Seeds a local moto with a user pool, an app client and a signed-in demo
user, and checks afterwards whether that user's tokens still work.

    moto_demo.py seed  --endpoint URL --state FILE   # prints the pool id
    moto_demo.py check --state FILE                  # are the tokens revoked?
"""

import argparse
import json
import sys

import boto3
from botocore.exceptions import ClientError

USERNAME = "demo@example.com"
PASSWORD = "Demo-Passw0rd!"


def client(endpoint):
    # moto checks no signatures: any key works, and the caller's shell may have none.
    return boto3.client(
        "cognito-idp",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )


def seed(endpoint, state_file):
    idp = client(endpoint)
    pool_id = idp.create_user_pool(PoolName="session-service-demo")["UserPool"]["Id"]
    client_id = idp.create_user_pool_client(
        UserPoolId=pool_id,
        ClientName="demo",
        ExplicitAuthFlows=["ALLOW_ADMIN_USER_PASSWORD_AUTH", "ALLOW_REFRESH_TOKEN_AUTH"],
    )["UserPoolClient"]["ClientId"]
    idp.admin_create_user(UserPoolId=pool_id, Username=USERNAME, MessageAction="SUPPRESS")
    idp.admin_set_user_password(
        UserPoolId=pool_id, Username=USERNAME, Password=PASSWORD, Permanent=True
    )
    tokens = idp.admin_initiate_auth(
        UserPoolId=pool_id,
        ClientId=client_id,
        AuthFlow="ADMIN_USER_PASSWORD_AUTH",
        AuthParameters={"USERNAME": USERNAME, "PASSWORD": PASSWORD},
    )["AuthenticationResult"]
    state = {
        "endpoint": endpoint,
        "pool_id": pool_id,
        "client_id": client_id,
        "username": USERNAME,
        "access_token": tokens["AccessToken"],
        "refresh_token": tokens["RefreshToken"],
    }
    with open(state_file, "w", encoding="utf-8") as out:
        json.dump(state, out)
    print(pool_id)


def check(state_file):
    with open(state_file, encoding="utf-8") as f:
        state = json.load(f)
    idp = client(state["endpoint"])
    verdicts = {}
    try:
        idp.admin_initiate_auth(
            UserPoolId=state["pool_id"],
            ClientId=state["client_id"],
            AuthFlow="REFRESH_TOKEN_AUTH",
            AuthParameters={"REFRESH_TOKEN": state["refresh_token"]},
        )
        verdicts["refresh token"] = "valid"
    except ClientError as e:
        verdicts["refresh token"] = "REVOKED (" + e.response["Error"]["Code"] + ")"
    try:
        idp.get_user(AccessToken=state["access_token"])
        verdicts["access token"] = "valid"
    except ClientError as e:
        verdicts["access token"] = "REVOKED (" + e.response["Error"]["Code"] + ")"
    for token, verdict in verdicts.items():
        print(f"{state['username']} {token}: {verdict}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    seed_cmd = sub.add_parser("seed", help="create the pool, client and signed-in user")
    seed_cmd.add_argument("--endpoint", required=True, help="moto URL, e.g. http://127.0.0.1:5000")
    seed_cmd.add_argument("--state", required=True, help="file to write the ids and tokens to")
    check_cmd = sub.add_parser("check", help="try the seeded user's tokens")
    check_cmd.add_argument("--state", required=True, help="file written by seed")
    args = parser.parse_args()
    if args.command == "seed":
        seed(args.endpoint, args.state)
    else:
        check(args.state)


if __name__ == "__main__":
    sys.exit(main())
